"""Server-Sent Events: `GET /v1/sites/{site}/events`, one viewer per response, fed by its
queue (docs/protocol.md). Written as a raw ASGI response so every write has a timeout and a
client that stops reading is closed as slow, like a WebSocket viewer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import orjson
from fastapi import Response
from starlette.types import Message, Receive, Scope, Send

from app.broker.base import BrokerUnavailable
from app.codes import CloseCode, ErrorCode
from app.errors import ApiError
from app.gateway import viewers
from app.gateway.hub import Viewer, sse_chunk
from app.gateway.metrics import count_close
from app.gateway.replay import StartRequest, StorageUnavailable
from app.gateway.state import GatewayState
from app.servers.postgres import STORAGE_ERRORS
from app.store.sites import Site
from app.web.http import ABORT
from app.web.responses import error_response

#: SSE comment line sent when a stream is idle, so proxies and dead peers are noticed.
SSE_HEARTBEAT_S = 15.0


class SseStream(Response):
    """A Server-Sent Events response fed by one viewer's queue.

    Written as a raw ASGI response (not a StreamingResponse) so every write has a timeout and a
    client that stops reading is closed as slow, like a WebSocket viewer.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        state: GatewayState,
        site: Site,
        req: StartRequest,
        options: viewers.StreamOptions,
    ) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.state = state
        self.site = site
        self.req = req
        self.options = options
        self._scope: Scope = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        state = self.state
        wake, drained = asyncio.Event(), asyncio.Event()
        try:
            viewer, start = await viewers.join(state, self.site, self.req, wake.set, self.options)
        except StorageUnavailable:
            # A stream that ends with a close event, not an HTTP error: EventSource gives up
            # on an error status, but reconnects (with Last-Event-ID) after a stream ends.
            await self._refuse(send, CloseCode.STORAGE_UNAVAILABLE)
            return
        except viewers.Refused as exc:  # a bound of this gateway (busy): try again later
            await self._refuse(send, exc.close)
            return
        except (TimeoutError, BrokerUnavailable, *STORAGE_ERRORS):
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
                    message = {"type": "http.response.body", "body": pending, "more_body": True}
                    await _send_reading(send, message, timeout, self._unsent())
                    drained.set()
                idle = False
                try:
                    async with asyncio.timeout(SSE_HEARTBEAT_S):
                        await wake.wait()
                except TimeoutError:
                    idle = True
                wake.clear()
                if viewer.close_code is not None:
                    await self._close(send, viewer.close_code)
                    return
                if viewer.closed:
                    return
                items = viewer.take()
                pending = sse_chunk(items, viewer.epoch) if items else b""
                if items:
                    state.stats.count(items)
                    state.stats.frames += 1
                elif idle:
                    pending = b": ping\n\n"  # silence for SSE_HEARTBEAT_S: proxies, dead peers
                else:
                    drained.set()  # a sampled viewer's queue, all of it left out: room again
        except TimeoutError:
            if viewer.fail(CloseCode.SLOW_CONSUMER):  # not already closed as slow: count it
                state.metrics.closes.labels("write_timeout").inc()
            elif viewer.close_code is not None:  # closed, but its close event cannot be sent
                count_close(state.metrics, viewer.close_code)
            self._abort()  # the client does not read: nothing more can reach it
        except OSError:
            viewer.release()

    def _unsent(self) -> Callable[[], int] | None:
        """Bytes written to the client and not taken yet (app.web.http.unsent_bytes)."""
        unsent: Callable[[], int] | None
        unsent = self._scope.get("extensions", {}).get(ABORT, {}).get("unsent")
        return unsent

    def _abort(self) -> None:
        """Drop the connection at once, write buffer and all (app.web.http.ABORT): a close would
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
        count_close(self.state.metrics, code)
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


async def _send_reading(
    send: Send, message: Message, idle_s: float, unsent: Callable[[], int] | None
) -> None:
    """Send `message`; TimeoutError once the client has taken none of what waits for it for
    `idle_s` seconds. The write itself may take longer while the client keeps reading: a
    replay's large writes to a slow reader (docs/protocol.md)."""
    if unsent is None:
        async with asyncio.timeout(idle_s):
            await send(message)
        return
    async with asyncio.timeout(None) as deadline:
        watch = _Progress(deadline, idle_s, unsent)
        try:
            await send(message)
        finally:
            watch.stop()


class _Progress:
    """Ends a write (its `deadline`, now) once `idle_s` have passed since the client was last
    seen taking bytes, looking every `idle_s` / 4 while the write waits. The look decides, not
    a timer of its own: bytes taken just before the end are seen before it comes."""

    def __init__(self, deadline: asyncio.Timeout, idle_s: float, unsent: Callable[[], int]):
        self._loop = asyncio.get_running_loop()
        self._deadline = deadline
        self._idle_s = idle_s
        self._unsent = unsent
        self._left: int | None = None
        self._taken_at = self._loop.time()
        # Soon: once the write has put its bytes out (uvicorn writes, then waits).
        self._timer: asyncio.Handle = self._loop.call_soon(self._look)

    def _look(self) -> None:
        now, left = self._loop.time(), self._unsent()
        if self._left is None or left < self._left:  # the client took some: it reads
            self._taken_at = now
        elif now - self._taken_at >= self._idle_s:
            self._deadline.reschedule(now)  # nothing taken for idle_s: the write fails
            return
        self._left = left
        self._timer = self._loop.call_later(self._idle_s / 4, self._look)

    def stop(self) -> None:
        self._timer.cancel()


async def _wait_disconnect(receive: Receive, viewer: Viewer) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            viewer.release()
            viewer.wake()
            return
