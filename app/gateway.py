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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response, WebSocket
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from app import tokens
from app.codes import CloseCode, ErrorCode
from app.connections import Status, open_pool, open_redis, probe_postgres, probe_redis
from app.errors import ApiError
from app.feed import Feeds
from app.health import Checks, health_router
from app.hub import Hub, Viewer, event_count, sse_chunk, ws_frames
from app.metrics import GatewayMetrics
from app.responses import error_response
from app.settings import Settings
from app.sites import Site, SiteCache, is_valid_site_id
from app.store import STORAGE_ERRORS

log = logging.getLogger(__name__)

#: Largest frame a viewer may send; viewers only ever send tiny control messages.
MAX_CLIENT_FRAME = 4096
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
        state = GatewayState(settings, pool, client, metrics, hub, feeds, SiteCache(pool))
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
        return SseStream(state, site_info)

    return app


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


def _welcome(site: Site) -> bytes:
    return orjson.dumps({"type": "welcome", "site": site.id, "epoch": site.epoch})


# -- WebSocket ----------------------------------------------------------------------------


async def _serve_websocket(state: GatewayState, secret: str, ws: WebSocket, site: str) -> None:
    await ws.accept()
    token = ws.query_params.get("token") or tokens.bearer(ws.headers.get("authorization"))
    try:
        site_info = await _check_viewer(state, secret, site, token)
    except Refused as exc:
        await ws.close(exc.close, exc.error.message[:120])
        return
    wake = asyncio.Event()
    viewer = Viewer(site, site_info.epoch, state.settings.viewer_queue_bytes, wake.set)
    try:
        await state.feeds.join(viewer)
    except (TimeoutError, *STORAGE_ERRORS) as exc:
        log.warning("could not subscribe", extra={"site": site, "error": repr(exc)})
        await ws.close(CloseCode.INTERNAL, "subscription failed, reconnect")
        return
    state.metrics.connections.labels("websocket").inc()
    viewer.push_notice(_welcome(site_info))
    reader = asyncio.create_task(_ws_reader(ws, viewer))
    writer = asyncio.create_task(_ws_writer(state, ws, viewer, wake))
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
        for task in (reader, writer):
            task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
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
    state: GatewayState, ws: WebSocket, viewer: Viewer, wake: asyncio.Event
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
            state.metrics.delivered.inc(event_count(items))
    except TimeoutError:
        state.metrics.closes.labels("write_timeout").inc()
        viewer.fail(CloseCode.SLOW_CONSUMER)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                await ws.close(CloseCode.SLOW_CONSUMER, "write timeout")
    except (WebSocketDisconnect, RuntimeError, OSError):
        viewer.release()  # the socket went away while writing


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

    def __init__(self, state: GatewayState, site: Site) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.state = state
        self.site = site

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        wake = asyncio.Event()
        viewer = Viewer(self.site.id, self.site.epoch, state.settings.viewer_queue_bytes, wake.set)
        try:
            await state.feeds.join(viewer)
        except (TimeoutError, *STORAGE_ERRORS):
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
            viewer.push_notice(_welcome(self.site))
            disconnected = asyncio.create_task(_wait_disconnect(receive, viewer))
            try:
                await self._write(send, viewer, wake, b"retry: 2000\n\n")
            finally:
                disconnected.cancel()
        finally:
            state.feeds.leave(viewer)
            state.metrics.connections.labels("sse").dec()

    async def _write(self, send: Send, viewer: Viewer, wake: asyncio.Event, first: bytes) -> None:
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
                state.metrics.delivered.inc(event_count(items))
                if items:
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
