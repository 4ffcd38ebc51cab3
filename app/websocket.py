"""The WebSocket viewer connection, served as raw ASGI.

The stream endpoint is the gateway's hot path: every delivered frame passes through it. It
speaks ASGI directly to uvicorn rather than through Starlette's WebSocket wrapper and FastAPI's
middleware (profiling showed those layers at a third of the gateway's CPU under fanout), and
write timeouts are enforced by one sweeper per process instead of a timer per write.

One connection = one `Viewer` in the hub + a writer task draining its queue + a one-off replay
task; the handler task itself reads the (rare) client frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from app import tokens, viewers
from app.broker import REDIS_ERRORS
from app.codes import CloseCode
from app.hub import Viewer, ws_frames
from app.replay import BadStart, parse_start
from app.store import STORAGE_ERRORS

if TYPE_CHECKING:
    from app.gateway import GatewayState

log = logging.getLogger(__name__)

#: Largest frame a viewer may send; viewers only ever send tiny control messages.
MAX_CLIENT_FRAME = 4096


@dataclass(eq=False, slots=True)
class Connection:
    """What the sweeper needs to see of a live WebSocket connection."""

    viewer: Viewer
    #: loop.time() when the current write began; 0.0 when not writing.
    write_started: float = 0.0
    writer: asyncio.Task[None] | None = field(default=None)


class RawWebSocket:
    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self._query = parse_qs(scope.get("query_string", b"").decode("latin-1"))

    def query(self, name: str) -> str | None:
        values = self._query.get(name)
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        key = name.encode()
        for k, v in self.scope.get("headers", []):
            if k == key:
                value: str = v.decode("latin-1")
                return value
        return None

    async def accept(self) -> bool:
        message = await self.receive()
        if message["type"] != "websocket.connect":
            return False
        await self.send({"type": "websocket.accept"})
        return True

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.send({"type": "websocket.close", "code": code, "reason": reason[:120]})


async def serve_stream(state: GatewayState, secret: str, ws: RawWebSocket, site: str) -> None:
    if not await ws.accept():
        return
    token = ws.query("token") or tokens.bearer(ws.header("authorization"))
    try:
        site_info = await viewers.check_viewer(state, secret, site, token)
        req = parse_start(ws.query("since"), ws.query("last"), ws.query("minutes"))
    except viewers.Refused as exc:
        await ws.close(exc.close, exc.error.message)
        return
    except BadStart as exc:
        await ws.close(CloseCode.BAD_REQUEST, str(exc))
        return
    wake, drained = asyncio.Event(), asyncio.Event()
    try:
        viewer, start = await viewers.join(state, site_info, req, wake)
    except (TimeoutError, *REDIS_ERRORS, *STORAGE_ERRORS) as exc:
        log.warning("could not subscribe", extra={"site": site, "error": repr(exc)})
        await ws.close(CloseCode.INTERNAL, "subscription failed, reconnect")
        return
    viewer.sink = direct_sink(ws.send)
    conn = Connection(viewer)
    state.connections.add(conn)
    state.metrics.connections.labels("websocket").inc()
    conn.writer = asyncio.create_task(_write(state, ws, conn, wake, drained))
    replay = asyncio.create_task(viewers.replay(state, viewer, start, drained))
    try:
        await _read(ws, viewer, conn.writer)
        if not conn.writer.done():
            # The peer left, or broke the protocol (the writer then sends the close code).
            if viewer.close_code is None:
                viewer.release()
            wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.writer), 2.0)
    finally:
        state.connections.discard(conn)
        state.feeds.leave(viewer)
        for task in (conn.writer, replay):
            task.cancel()
        await asyncio.gather(conn.writer, replay, return_exceptions=True)
        state.metrics.connections.labels("websocket").dec()


async def _read(ws: RawWebSocket, viewer: Viewer, writer: asyncio.Task[None]) -> None:
    """Viewers send only `{"type":"ping"}`; anything else is a protocol error. Returns when
    the peer leaves, breaks the protocol, or the writer ends the connection."""
    receive = asyncio.ensure_future(ws.receive())
    try:
        while viewer.close_code is None:
            await asyncio.wait({receive, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                return  # the writer closed the connection
            message: MutableMapping[str, Any] = receive.result()
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
            if kind != "ping":
                viewer.fail(CloseCode.PROTOCOL)
                return
            viewer.push_notice(b'{"type":"pong"}')
            receive = asyncio.ensure_future(ws.receive())
    finally:
        receive.cancel()


async def _write(
    state: GatewayState,
    ws: RawWebSocket,
    conn: Connection,
    wake: asyncio.Event,
    drained: asyncio.Event,
) -> None:
    viewer = conn.viewer
    loop = asyncio.get_running_loop()
    send = ws.send
    try:
        while True:
            await wake.wait()
            wake.clear()
            if viewer.close_code is not None:
                await _close(state, ws, viewer.close_code)
                return
            if viewer.closed:
                return
            items = viewer.take()
            conn.write_started = loop.time()
            viewer.writing = True  # no direct frame may overtake these (app.hub)
            for frame in ws_frames(items):
                await send({"type": "websocket.send", "text": frame.decode()})
                state.stats.frames += 1
            viewer.writing = False
            conn.write_started = 0.0
            drained.set()
            state.stats.count(items)
    except (OSError, RuntimeError) as exc:  # the socket went away while writing
        log.debug("write failed", extra={"error": repr(exc)})
        viewer.release()


async def _close(state: GatewayState, ws: RawWebSocket, code: int) -> None:
    if code == CloseCode.SHUTTING_DOWN:
        state.metrics.closes.labels("shutting_down").inc()
    await ws.close(code, CloseCode(code).name.lower())


def direct_sink(send: Send) -> Callable[[bytes], bool] | None:
    """A way to write ready frames straight to the connection's transport, when the server is
    uvicorn's sans-I/O WebSocket protocol (what `sitewire gateway` runs): `send` is bound to
    it. The hub writes one shared frame to every caught-up viewer this way, with no task
    switch per viewer. It refuses (False) while the transport is paused by flow control or
    closing, and the hub then queues the events for the writer task instead."""
    protocol: Any = getattr(send, "__self__", None)
    transport = getattr(protocol, "transport", None)
    writable = getattr(protocol, "writable", None)
    if transport is None or not isinstance(writable, asyncio.Event):
        return None

    def sink(frame: bytes) -> bool:
        if not writable.is_set() or transport.is_closing() or protocol.close_sent:
            return False
        transport.write(frame)
        return True

    return sink


def sweep_writes(state: GatewayState, now: float, timeout: float) -> None:
    """Close connections whose current write has taken longer than `timeout` (a viewer that
    stopped reading: the transport is paused and the write never completes)."""
    for conn in list(state.connections):
        if conn.write_started and now - conn.write_started > timeout and conn.writer:
            if conn.viewer.close_code is None:  # one close, one reason: not already counted
                state.metrics.closes.labels("write_timeout").inc()
            conn.viewer.fail(CloseCode.SLOW_CONSUMER)
            conn.writer.cancel()
            conn.write_started = 0.0
