"""The gateway ASGI app: holds viewer connections and pushes each site's live events.

Endpoints (docs/protocol.md): `GET /v1/sites/{site}/stream` (WebSocket) and
`GET /v1/sites/{site}/events` (Server-Sent Events). Each connection is a `Viewer` in the hub
with a writer task draining its bounded queue; the fanout never awaits a socket.
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

import asyncpg
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response, WebSocket
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from app import tokens
from app.assets import Asset
from app.broker import REDIS_ERRORS
from app.codes import CloseCode, ErrorCode
from app.connections import Status, open_pool, open_redis, probe_postgres, probe_redis
from app.errors import ApiError
from app.feed import Feeds
from app.health import Checks, health_router
from app.history import page_after
from app.hub import EVENT, Hub, Viewer, event_age_s, event_count, sse_chunk, ws_frames
from app.metrics import GatewayMetrics
from app.names import Names
from app.replay import BadStart, Replayer, Start, StartRequest, parse_start, run_replay, welcome
from app.responses import error_response
from app.settings import Settings
from app.sites import Site, SiteCache, is_valid_site_id
from app.store import STORAGE_ERRORS
from app.wire import format_cursor, parse_cursor

log = logging.getLogger(__name__)

#: Largest frame a viewer may send; viewers only ever send tiny control messages.
MAX_CLIENT_FRAME = 4096
#: Most events one history page returns.
HISTORY_MAX_LIMIT = 1000
#: SSE comment line sent when a stream is idle, so proxies and dead peers are noticed.
SSE_HEARTBEAT_S = 15.0


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    metrics: GatewayMetrics
    hub: Hub
    feeds: Feeds
    sites: SiteCache
    replayer: Replayer
    draining: bool = False
    writers: set[asyncio.Task[None]] = field(default_factory=set)

    async def checks(self) -> dict[str, Status]:
        results = {
            "postgres": await probe_postgres(self.pool),
            "redis": await probe_redis(self.redis),
        }
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


def create_app(settings: Settings) -> FastAPI:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    secret = settings.require_secret()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await open_pool(settings)
        client = open_redis(settings)
        hub = Hub()
        feeds = Feeds(hub, settings, client, pool, metrics)
        replayer = Replayer(client, pool, Names(settings.key_prefix), metrics)
        state = GatewayState(settings, pool, client, metrics, hub, feeds, SiteCache(pool), replayer)
        metrics.queue_bytes.set_function(hub.queued_bytes)
        app.state.gateway = state
        feeds.start()
        try:
            yield
        finally:
            if not state.draining:
                await state.drain()
            await feeds.close()
            await client.aclose()
            await pool.close()

    app = FastAPI(title="Sitewire gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    def checks() -> Checks:
        state: GatewayState = app.state.gateway
        return state.checks

    app.include_router(health_router("gateway", checks, frozenset({"redis"}), registry))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.websocket("/v1/sites/{site}/stream")
    async def stream(websocket: WebSocket, site: str) -> None:
        await _serve_websocket(app.state.gateway, secret, websocket, site)

    @app.get("/v1/sites/{site}/events")
    async def events(request: Request, site: str) -> Response:
        state: GatewayState = app.state.gateway
        token = request.query_params.get("token") or tokens.bearer(
            request.headers.get("authorization")
        )
        site_info = await _authorize(state, secret, site, token)
        query = request.query_params
        since = request.headers.get("last-event-id") or query.get("since")
        try:
            req = parse_start(since, None if since else query.get("last"), query.get("minutes"))
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
        token = request.query_params.get("token") or tokens.bearer(
            request.headers.get("authorization")
        )
        site_info = await _authorize(state, secret, site, token)
        return await _history_page(state, site_info, request.query_params)

    return app


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
        events = await page_after(state.pool, site.id, site.epoch, after, limit, before)
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), "after") from None
    except STORAGE_ERRORS:
        raise ApiError(
            ErrorCode.STORAGE_UNAVAILABLE, "history is unavailable", retry_after=2
        ) from None
    next_cursor = format_cursor(site.epoch, events[-1][0]) if len(events) == limit else None
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


class Refused(Exception):
    """A viewer refused before it joins: carries the close code and the HTTP error."""

    def __init__(self, close: CloseCode, error: ApiError) -> None:
        super().__init__(error.message)
        self.close = close
        self.error = error


async def _authorize(state: GatewayState, secret: str, site: str, token: str | None) -> Site:
    try:
        return await _check_viewer(state, secret, site, token)
    except Refused as exc:
        raise exc.error from None


async def _check_viewer(state: GatewayState, secret: str, site: str, token: str | None) -> Site:
    """Who may watch: a valid token for exactly this site, of a registered site."""
    if state.draining:
        raise Refused(
            CloseCode.SHUTTING_DOWN,
            ApiError(ErrorCode.STORAGE_UNAVAILABLE, "gateway is shutting down", retry_after=1),
        )
    try:
        if not is_valid_site_id(site):
            raise tokens.InvalidToken("the token is not valid for this site")
        tokens.verify(secret, token, site)
    except tokens.InvalidToken as exc:
        state.metrics.auth_failures.inc()
        raise Refused(CloseCode.UNAUTHORIZED, ApiError(ErrorCode.UNAUTHORIZED, str(exc))) from None
    try:
        found = await state.sites.get(site)
    except STORAGE_ERRORS:
        raise Refused(
            CloseCode.INTERNAL,
            ApiError(ErrorCode.STORAGE_UNAVAILABLE, "site registry unavailable", retry_after=2),
        ) from None
    if found is None:
        raise Refused(
            CloseCode.UNKNOWN_SITE,
            ApiError(ErrorCode.UNKNOWN_SITE, f"site {site} is not registered", "site"),
        )
    return found


async def _join(
    state: GatewayState, site: Site, req: StartRequest, wake: asyncio.Event
) -> tuple[Viewer, Start]:
    """Add a viewer to the live feed (holding live events), decide where its stream starts,
    and queue its welcome. Raises what subscribing raises."""
    viewer = Viewer(site.id, site.epoch, state.settings.viewer_queue_bytes, wake.set)
    viewer.start_replay()
    await state.feeds.join(viewer)
    start = await state.replayer.resolve(site.id, site.epoch, state.feeds.head(site.id), req)
    viewer.push_notice(welcome(site.id, site.epoch, start))
    return viewer, start


def _gap_notice(viewer: Viewer, after: int) -> None:
    cursor = format_cursor(viewer.epoch, after)
    viewer.push_notice(orjson.dumps({"type": "gap", "after": cursor, "recovered": False}))


async def _replay(
    state: GatewayState, viewer: Viewer, start: Start, drained: asyncio.Event
) -> None:
    try:
        await run_replay(state.replayer, viewer, start, drained, _gap_notice)
    except Exception:
        log.exception("replay failed", extra={"site": viewer.site})
        viewer.fail(CloseCode.INTERNAL)


# -- WebSocket ----------------------------------------------------------------------------


async def _serve_websocket(state: GatewayState, secret: str, ws: WebSocket, site: str) -> None:
    await ws.accept()
    token = ws.query_params.get("token") or tokens.bearer(ws.headers.get("authorization"))
    try:
        site_info = await _check_viewer(state, secret, site, token)
        q = ws.query_params
        req = parse_start(q.get("since"), q.get("last"), q.get("minutes"))
    except Refused as exc:
        await ws.close(exc.close, exc.error.message[:120])
        return
    except BadStart as exc:
        await ws.close(CloseCode.BAD_REQUEST, str(exc)[:120])
        return
    wake, drained = asyncio.Event(), asyncio.Event()
    try:
        viewer, start = await _join(state, site_info, req, wake)
    except (TimeoutError, *REDIS_ERRORS, *STORAGE_ERRORS) as exc:
        log.warning("could not subscribe", extra={"site": site, "error": repr(exc)})
        await ws.close(CloseCode.INTERNAL, "subscription failed, reconnect")
        return
    state.metrics.connections.labels("websocket").inc()
    reader = asyncio.create_task(_ws_reader(ws, viewer))
    writer = asyncio.create_task(_ws_writer(state, ws, viewer, wake, drained))
    replay = asyncio.create_task(_replay(state, viewer, start, drained))
    try:
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if not writer.done():
            # The peer left, or broke the protocol (the writer then sends the close code).
            if viewer.close_code is None:
                viewer.release()
            wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), 2.0)
    finally:
        state.feeds.leave(viewer)
        for task in (reader, writer, replay):
            task.cancel()
        await asyncio.gather(reader, writer, replay, return_exceptions=True)
        state.metrics.connections.labels("websocket").dec()


async def _ws_reader(ws: WebSocket, viewer: Viewer) -> None:
    """Viewers send only `{"type":"ping"}`; anything else is a protocol error."""
    while viewer.close_code is None:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text") or message.get("bytes") or b""
        if len(data) > MAX_CLIENT_FRAME:
            viewer.fail(CloseCode.FRAME_TOO_LARGE)
            return
        try:
            kind = orjson.loads(data).get("type")
        except (orjson.JSONDecodeError, AttributeError):
            kind = None
        if kind == "ping":
            viewer.push_notice(b'{"type":"pong"}')
        else:
            viewer.fail(CloseCode.PROTOCOL)
            return


async def _ws_writer(
    state: GatewayState, ws: WebSocket, viewer: Viewer, wake: asyncio.Event, drained: asyncio.Event
) -> None:
    timeout = state.settings.write_timeout_s
    try:
        while True:
            await wake.wait()
            wake.clear()
            if viewer.close_code is not None:
                await _ws_close(state, ws, viewer.close_code)
                return
            if viewer.closed:
                return
            items = viewer.take()
            async with asyncio.timeout(timeout):
                for frame in ws_frames(items):
                    await ws.send_text(frame.decode())
                    state.metrics.frames.inc()
            drained.set()
            _count_delivery(state, items)
    except TimeoutError:
        state.metrics.closes.labels("write_timeout").inc()
        viewer.fail(CloseCode.SLOW_CONSUMER)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                await ws.close(CloseCode.SLOW_CONSUMER, "write timeout")
    except (WebSocketDisconnect, RuntimeError, OSError):
        viewer.release()  # the socket went away while writing


def _count_delivery(state: GatewayState, items: list[tuple[int, int, bytes]]) -> None:
    """Count delivered events and sample latency once per write (the newest event in it)."""
    state.metrics.delivered.inc(event_count(items))
    newest = next((data for kind, _, data in reversed(items) if kind == EVENT), None)
    if newest is not None:
        age = event_age_s(newest, time.time())
        if age is not None:
            state.metrics.latency.observe(max(age, 0.0))


async def _ws_close(state: GatewayState, ws: WebSocket, code: int) -> None:
    reason = CloseCode(code).name.lower()
    if code == CloseCode.SHUTTING_DOWN:
        state.metrics.closes.labels("shutting_down").inc()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await ws.close(code, reason)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        wake, drained = asyncio.Event(), asyncio.Event()
        try:
            viewer, start = await _join(state, self.site, self.req, wake)
        except (TimeoutError, *REDIS_ERRORS, *STORAGE_ERRORS):
            error = ApiError(ErrorCode.STORAGE_UNAVAILABLE, "subscription failed", retry_after=1)
            await error_response(error)(scope, receive, send)
            return
        state.metrics.connections.labels("sse").inc()
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
                    ],
                }
            )
            disconnected = asyncio.create_task(_wait_disconnect(receive, viewer))
            replay = asyncio.create_task(_replay(state, viewer, start, drained))
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
                    _count_delivery(state, items)
                    state.metrics.frames.inc()
        except TimeoutError:
            state.metrics.closes.labels("write_timeout").inc()
            viewer.fail(CloseCode.SLOW_CONSUMER)
        except OSError:
            viewer.release()

    async def _close(self, send: Send, code: int) -> None:
        body = orjson.dumps({"type": "close", "code": code, "reason": CloseCode(code).name.lower()})
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"event: close\ndata: " + body + b"\n\n",
                        "more_body": False,
                    }
                )


async def _wait_disconnect(receive: Receive, viewer: Viewer) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            viewer.release()
            viewer.wake()
            return
