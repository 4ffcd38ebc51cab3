"""The WebSocket viewer connection: an asyncio protocol of our own, served by uvicorn.

uvicorn hands every WebSocket upgrade to the protocol class named by its `ws=` setting
(workers/serve.py names `protocol_class(app)`). The handshake is validated by the `websockets`
library's sans-I/O `ServerProtocol`, as in uvicorn's own sans-I/O implementation, and frames are
parsed by it; but there is no ASGI application, no receive queue and no task per connection.
An idle viewer costs one protocol object, its `ServerProtocol` and its `Viewer` in the hub:

- Admission (token, site, join, replay) runs in a short-lived task; once the viewer is live,
  nothing of it is left but objects waiting for callbacks.
- Client frames arrive in `data_received` and are answered at once (viewers only send pings).
- Queued frames are written by a `call_soon` flush when the viewer's queue goes non-empty, and
  again on `resume_writing` when flow control held them back: no writer task, no Event.
- Keepalive pings for every connection share one timer per process (`Keepalive`); write
  timeouts are enforced by the gateway's housekeeping sweep (`sweep_writes`).
- Closing: once either side has started the closing handshake (or a frame failed the
  connection), nothing but the close is sent and the viewer leaves the hub at once; the socket
  is dropped if it has not closed within CLOSE_TIMEOUT_S, a timer cancelled when it has.

Caught-up viewers get the hub's shared frames through `sink`: the transport's own `write`, set
only while the connection can take a frame now (`_direct`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import parse_qsl, unquote

import orjson
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, CLOSING, OPEN
from websockets.server import ServerProtocol

from app import tokens
from app.broker.base import BrokerUnavailable
from app.codes import CloseCode, ErrorCode, StandardCloseCode
from app.errors import ApiError
from app.gateway import viewers
from app.gateway.hub import Viewer, ws_frames
from app.gateway.metrics import count_close
from app.gateway.replay import BadStart, StorageUnavailable, parse_start
from app.gateway.state import GatewayState
from app.servers.postgres import STORAGE_ERRORS
from app.web.http import TakesUpgrade, unsent_bytes

if TYPE_CHECKING:
    import uvicorn
    from uvicorn.server import ServerState


log = logging.getLogger(__name__)

#: The WebSocket stream endpoint: GET /v1/sites/{site}/stream.
STREAM_PATH = re.compile(r"^/v1/sites/([^/]+)/stream$")
#: Largest frame a viewer may send; viewers only ever send tiny control messages.
MAX_CLIENT_FRAME = 4096
#: Frames (of any kind: pings, pongs, fragments) a client may send within
#: CLIENT_FRAME_WINDOW_S besides its answers to the server's pings (one per ping interval):
#: a viewer sends a ping message now and then.
MAX_CLIENT_FRAMES = 50
CLIENT_FRAME_WINDOW_S = 10.0
#: Bytes of one read parsed before the frame count is checked.
READ_SLICE = 4096
#: Seconds a closing connection waits for the peer's close frame before it is dropped.
CLOSE_TIMEOUT_S = 5.0
#: What a WebSocket upgrade on any other path gets: what the ASGI app answered before.
NOT_A_STREAM = 403
PONG = b'{"type":"pong"}'
#: Close codes websockets' parser fails a connection with that the close table names.
_COUNTED_PARSER_CODES = frozenset(StandardCloseCode)


class StreamProtocol(TakesUpgrade):
    """One viewer's WebSocket connection on `GET /v1/sites/{site}/stream`."""

    __slots__ = (
        "_server", "abort_timer", "closing", "drained", "flush_pending", "fragments", "frames",
        "frames_since", "gone", "paused", "ping_payload", "ping_unsent", "state", "task",
        "transport", "unsent", "viewer", "write_started", "ws",
    )  # fmt: skip

    #: The transport this class serves; bound per process by `protocol_class`.
    host: ClassVar[WebSocketTransport]

    def __init__(
        self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any]
    ) -> None:
        self._server = server_state
        assert self.host.state is not None  # uvicorn serves once the lifespan has started
        self.state: GatewayState = self.host.state
        #: Handshake and frame parsing; None once the connection is lost (see connection_lost).
        self.ws: ServerProtocol | None = ServerProtocol(max_size=config.ws_max_size)
        self.transport: asyncio.Transport | None = None
        self.viewer: Viewer | None = None
        #: Admission, then the replay; None once the viewer is live.
        self.task: asyncio.Task[None] | None = None
        #: Set after each flush while a replay waits for room in the queue (None otherwise).
        self.drained: asyncio.Event | None = None
        #: loop.time() since when queued frames wait for flow control; 0.0 when not waiting.
        self.write_started = 0.0
        #: Bytes written and not yet taken by the peer when last looked at (`sweep`).
        self.unsent = 0
        self.flush_pending = False
        #: Flow control: the transport's buffer is over its high-water mark.
        self.paused = False
        #: The closing handshake has started, from either side, or the connection failed.
        self.closing = False
        #: `connection_lost` has run.
        self.gone = False
        #: Drops the socket if it is still open CLOSE_TIMEOUT_S after we started closing it.
        self.abort_timer: asyncio.TimerHandle | None = None
        #: The payload of the keepalive ping awaiting its pong (None: none outstanding).
        self.ping_payload: bytes | None = None
        #: Bytes not taken by the peer just after that ping was written (ping included).
        self.ping_unsent = 0
        #: A fragmented client message being put together (rare; None otherwise).
        self.fragments: bytearray | None = None
        #: Client frames in the window that began at `frames_since` (loop time).
        self.frames = 0
        self.frames_since = 0.0

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)  # type: ignore[arg-type]  # uvicorn's shutdown

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        # Parsed READ_SLICE bytes at a time, the frame count checked after each: one read may
        # hold 256 KiB (~43,000 empty frames, ~40 ms of parsing) before any count could stop
        # it, and a client reconnecting 31 times a second held a gateway at 99 % that way.
        for start in range(0, len(data), READ_SLICE):
            end = start + READ_SLICE
            if not self._receive(ws, data[start:end], data if end >= len(data) else b""):
                break
        if ws.state is CLOSING or ws.state is CLOSED:  # the peer's close, or a failed frame
            self._closing()
        self._write_out()

    def _receive(self, ws: ServerProtocol, part: bytes, whole: bytes) -> bool:
        """Parse `part` of a read and act on what it holds; False once the rest of the read
        is not worth parsing (the connection failed or is closing). `whole`: the read, when
        `part` is its last slice (else empty)."""
        sent = ws.close_sent
        ws.receive_data(part)
        if sent is None and ws.close_sent is not None and ws.close_rcvd is None:
            self._parser_failed(ws.close_sent.code)
        events = ws.events_received()
        framed = len(events) > 1 or (events and isinstance(events[0], Frame))
        if framed and self._too_many_frames(sum(isinstance(e, Frame) for e in events)):
            return False  # the rest is not looked at: the connection has failed
        for event in events:
            if isinstance(event, Request):
                self._handshake(ws, event)
                if len(events) == 1 and whole.endswith(b"\r\n\r\n"):
                    _forget_request(ws)
            elif isinstance(event, Frame):
                self._frame(event)
        return ws.state is not CLOSING and ws.state is not CLOSED

    def eof_received(self) -> bool | None:
        if self.viewer is not None:  # the transport closes now: no more direct frames
            self.viewer.sink = None
        if self.transport is not None:
            # asyncio's close waits for the send buffer to drain, which a peer that stopped
            # reading never lets happen: bound it as any other close.
            self._abort_later(self.transport)
        return None  # close the transport: a viewer that half-closes is gone

    def pause_writing(self) -> None:
        # Reading goes on: a slow reader's pongs must still be read. What a client that never
        # reads can make us write past flow control (a pong per ping) is bounded by the frame
        # limit (`_too_many_frames`) and by the keepalive, which closes it as stale.
        self.paused = True
        self._direct()

    def resume_writing(self) -> None:
        self.paused = False
        self.write_started = 0.0
        self._flush()
        self._direct()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self.abort_timer is not None:
            # Pending, it would keep the transport (and its buffers) for CLOSE_TIMEOUT_S.
            self.abort_timer.cancel()
            self.abort_timer = None
        self.ping_payload = None
        # The keepalive queue may hold this object for up to an interval: keep it small.
        self.ws = None
        self.transport = None
        self._server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        self._leave()

    def shutdown(self) -> None:
        """uvicorn's shutdown (after the drain): close what is left as uvicorn would, 1012."""
        if self.task is not None:
            self.task.cancel()
        self._close(StandardCloseCode.SERVICE_RESTART, "")
        if self.transport is not None:
            self.transport.close()

    # -- the opening handshake and admission -----------------------------------------------

    def take_upgrade(
        self, method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """The upgrade request as uvicorn's parser read it (app.web.http): answered as
        `data_received` answers its bytes, without parsing them again."""
        ws = self.ws
        if ws is None:
            return
        try:
            request = _request(method, target, headers)
        except ValueError as exc:  # what websockets' own parser refuses (UnicodeError too)
            response = ws.reject(400, f"Failed to open a WebSocket connection: {exc}.\n")
            ws.send_response(_in_error_shape(response))
        else:
            self._handshake(ws, request)
            _forget_request(ws)  # the parser still waits for a request: frames from here on
        self._write_out()

    def _handshake(self, ws: ServerProtocol, request: Request) -> None:
        response = ws.accept(request)
        raw_path, _, query = request.path.partition("?")
        match = STREAM_PATH.match(unquote(raw_path))
        if response.status_code == 101 and match is None:
            response = ws.reject(NOT_A_STREAM, "")
        if response.status_code != 101:
            ws.send_response(_in_error_shape(response))
            return
        del response.headers["Date"]  # uvicorn's own (cached) Date comes with its defaults
        for name, value in self._server.default_headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        ws.send_response(response)
        assert self.transport is not None
        # Frames sent before the viewer is admitted wait in the socket (uvicorn's queue did).
        self.transport.pause_reading()
        self.host.keepalive.watch(self)
        refusal: viewers.BadOption | None = None
        try:
            params = viewers.single_values(parse_qsl(query, keep_blank_values=True))
        except viewers.BadOption as exc:
            params, refusal = {}, exc
        authorization = request.headers.get_all("Authorization")
        if len(authorization) > 1 and refusal is None:
            refusal = viewers.BadOption("Authorization is given more than once", "authorization")
        token = params.get("token") or tokens.bearer(authorization[0] if authorization else None)
        start = (params.get("since"), params.get("last"), params.get("minutes"))
        self.task = asyncio.get_running_loop().create_task(
            self._admit(unquote(match[1]) if match else "", token, start, params, refusal)
        )

    async def _admit(
        self,
        site: str,
        token: str | None,
        start: tuple[str | None, str | None, str | None],
        query: dict[str, str],
        refusal: viewers.BadOption | None = None,
    ) -> None:
        """Check the viewer, join it to the live feed, then replay what it asked for. The
        handshake is complete: refusals are close codes (docs/protocol.md)."""
        state = self.state
        try:
            if refusal is not None:  # a query the viewer must fix (a parameter given twice)
                raise BadStart(str(refusal))
            site_info = await viewers.check_viewer(state, self.host.secret, site, token)
            req = parse_start(*start)
            try:
                options = viewers.parse_options(query)
            except viewers.BadOption as exc:
                raise BadStart(str(exc)) from None
            viewer, begin = await viewers.join(state, site_info, req, self._wake, options)
            if self._live(viewer):
                self.drained = asyncio.Event()
                await viewers.replay(state, viewer, begin, self.drained)
        except viewers.Refused as exc:
            self._close(exc.close, exc.error.message)
        except BadStart as exc:
            self._close(CloseCode.BAD_REQUEST, str(exc))
        except StorageUnavailable:
            self._close(CloseCode.STORAGE_UNAVAILABLE, "storage unavailable, resume later")
        except (TimeoutError, BrokerUnavailable, *STORAGE_ERRORS) as exc:
            log.warning("could not subscribe", extra={"site": site, "error": repr(exc)})
            self._close(CloseCode.INTERNAL, "subscription failed, reconnect")
        except Exception:  # a bug: say so, and let the viewer reconnect
            log.exception("viewer admission failed", extra={"site": site})
            self._close(CloseCode.INTERNAL, "internal error, reconnect")
        finally:
            self.drained = None
            self.task = None

    def _live(self, viewer: Viewer) -> bool:
        if self.gone or self.closing:
            self.state.feeds.leave(viewer)
            return False
        self.viewer = viewer
        self._direct()
        self.host.connections.add(self)
        self.state.metrics.connections.labels("websocket").inc()
        assert self.transport is not None
        self.transport.resume_reading()
        self._wake()  # the welcome was queued before `viewer` was set
        return True

    def _leave(self) -> None:
        """The viewer leaves the hub (its queue is freed); the socket may still be closing."""
        viewer, self.viewer = self.viewer, None
        if viewer is None:
            return
        self.state.feeds.leave(viewer)
        self.host.connections.discard(self)
        self.state.metrics.connections.labels("websocket").dec()

    # -- client frames -----------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PONG:
            if self.ping_payload is not None and bytes(frame.data) == self.ping_payload:
                self.ping_payload = None
                self.host.keepalive.watch(self)
        elif opcode is Opcode.TEXT or opcode is Opcode.CONT:
            self._message_part(frame)
        elif opcode is Opcode.BINARY:
            # Refused at its first frame: a binary message is never put together.
            self._fail(StandardCloseCode.UNSUPPORTED_DATA, "text frames only (JSON)")
        # PING and CLOSE are answered by `ServerProtocol` itself (see `_write_out`), which also
        # checks masking, control frame limits and the order of continuation frames (1002).

    def _too_many_frames(self, count: int) -> bool:
        """More than the transport's `frame_limit` frames of any kind within
        CLIENT_FRAME_WINDOW_S fail the connection (1008): each costs the parser and the loop,
        and a viewer sends a ping now and then. Without it one client sending empty
        continuation frames or unasked pongs (which nothing else bounds) held a gateway at
        93 % of its core, every other viewer's events up to 29 s late."""
        now = asyncio.get_running_loop().time()
        if now - self.frames_since >= CLIENT_FRAME_WINDOW_S:
            self.frames_since, self.frames = now, 0
        self.frames += count
        if self.frames <= self.host.frame_limit:
            return False
        self._fail(StandardCloseCode.POLICY_VIOLATION, "too many frames")
        return True

    def _message_part(self, frame: Frame) -> None:
        """A text frame or a continuation of one (binary messages never get this far)."""
        if not self._reading():
            return
        if frame.fin and self.fragments is None:
            self._text(bytes(frame.data))
            return
        if self.fragments is None:
            self.fragments = bytearray()
        self.fragments += frame.data
        if frame.fin:
            data, self.fragments = bytes(self.fragments), None
            self._text(data)
        elif len(self.fragments) > MAX_CLIENT_FRAME:
            # Too large before its end: refused now, without waiting for (or decoding) the rest.
            data, self.fragments = bytes(self.fragments), None
            self._message(data)

    def _reading(self) -> bool:
        """Client messages still count: the connection is open and not asked to close (the
        rest of a read that closes the connection is dropped, and a message that could not
        be answered any more is not parsed)."""
        viewer = self.viewer
        return self._sendable() is not None and (viewer is None or viewer.close_code is None)

    def _text(self, data: bytes) -> None:
        """A whole text message, whether it came in one frame or in fragments: RFC 6455 wants
        it valid UTF-8 (each fragment alone need not be: a character may straddle two)."""
        try:
            data.decode()
        except UnicodeDecodeError:
            self._fail(StandardCloseCode.INVALID_DATA, "invalid UTF-8")
            return
        self._message(data)

    def _message(self, data: bytes) -> None:
        """Viewers send only `{"type":"ping"}`; anything else is a protocol error."""
        viewer = self.viewer
        if viewer is None:
            return
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
        viewer.push_notice(PONG)

    def _parser_failed(self, code: int) -> None:
        """websockets' parser failed the connection itself (a frame breaking RFC 6455, or a
        message over the size limit): counted like the closes this module sends."""
        if code in _COUNTED_PARSER_CODES:
            count_close(self.state.metrics, code)
        else:  # a code the close table does not name (the parser's own 1011): say so
            log.warning("websocket parser closed a connection", extra={"code": code})

    def _fail(self, code: StandardCloseCode, reason: str) -> None:
        """Fail the connection (RFC 6455 section 7.1.7) for a frame that breaks the WebSocket
        protocol, as the parser does for its own errors: a close frame, then the TCP close at
        once, without waiting for the peer's. Called from `data_received`, which writes both."""
        ws = self.ws
        if ws is not None and ws.state is OPEN:
            count_close(self.state.metrics, code)
            ws.fail(code, reason)
            self._closing()

    # -- writing -------------------------------------------------------------------------------

    def _wake(self) -> None:
        """The viewer's queue went non-empty (or it must close): flush soon, once."""
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        viewer = self.viewer
        if viewer is None:
            return
        if viewer.close_code is not None:
            self._close(viewer.close_code, CloseCode(viewer.close_code).name.lower())
            return
        ws = self._sendable()
        if ws is None or viewer.closed:
            return  # the queue was dropped, or it can no longer be sent: the connection closes
        if self.paused:
            # Flow control: the frames wait in the queue (capped) until `resume_writing`.
            if not self.write_started:
                self.write_started = asyncio.get_running_loop().time()
                self.unsent = self._unsent()
            return
        items = viewer.take()
        if not items:
            if self.drained is not None:
                self.drained.set()  # a sampled viewer's queue, all of it left out: room again
            return
        frames = ws_frames(items)
        for frame in frames:
            ws.send_text(frame)
        self._write_out()
        stats = self.state.stats
        stats.frames += len(frames)
        stats.count(items)
        if self.drained is not None:
            self.drained.set()

    def _direct(self) -> None:
        """Switch the hub's direct writes of shared frames on (the transport's own `write`)
        or off: off under flow control and once the connection is closing."""
        viewer, transport = self.viewer, self.transport
        if viewer is None or viewer.closed:
            return
        if (
            transport is None
            or transport.is_closing()
            or self.paused
            or self.closing
            or self.gone
            or viewer.sample is not None  # its frames are its own, not the shared ones
        ):
            viewer.sink = None
        else:
            viewer.sink = transport.write

    def _write_out(self) -> None:
        """Write what `ServerProtocol` produced (handshake, pongs, close frames); its empty
        write means "close the TCP connection". Nothing is written once the transport is
        closing: the peer could not get it."""
        transport, ws = self.transport, self.ws
        if transport is None or ws is None:
            return
        for data in ws.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            else:
                transport.close()
                self._direct()
                self._abort_later(transport)

    def _sendable(self) -> ServerProtocol | None:
        """`ServerProtocol` while data frames and pings may be sent; None once either side has
        started closing (it raises InvalidState for data frames then) or the transport is
        closing or gone."""
        ws, transport = self.ws, self.transport
        if ws is None or ws.state is not OPEN or self.closing:
            return None
        if transport is None or transport.is_closing():
            return None
        return ws

    def _closing(self) -> None:
        """The closing handshake has started (from either side) or the connection failed: no
        more frames but the close, and the viewer leaves the hub now, not at connection_lost
        (its queue and shared frames could only be dropped). Keepalive stops too: the abort
        timer bounds the wait for the peer from here on."""
        self.closing = True
        self.ping_payload = None
        self._leave()

    def _close(self, code: int, reason: str) -> None:
        """Send a close frame, leave the hub, and drop the socket if the peer does not
        answer within CLOSE_TIMEOUT_S."""
        transport = self.transport
        if self.closing or transport is None or self.gone:
            self._leave()
            return
        self._closing()
        if self.ws is not None and self.ws.state is OPEN:
            count_close(self.state.metrics, code)
            self.ws.send_close(code, reason[:120])
            self._write_out()
        if not transport.is_closing():
            transport.resume_reading()  # to read the peer's close frame
            self._abort_later(transport)

    def _abort_later(self, transport: asyncio.Transport) -> None:
        """Drop the socket in CLOSE_TIMEOUT_S unless it closes first (`connection_lost` cancels
        this): a peer may never answer our close frame, or never read what is still buffered
        in front of it (a transport's `close` waits for its buffer to drain)."""
        if self.abort_timer is None and not self.gone:
            loop = asyncio.get_running_loop()
            self.abort_timer = loop.call_later(CLOSE_TIMEOUT_S, transport.abort)

    # -- keepalive and timeouts ------------------------------------------------------------

    def ping(self) -> bytes | None:
        """Send a keepalive ping (Keepalive calls this); its payload, or None when closed."""
        ws = self._sendable()
        if ws is None:
            return None
        self.ping_payload = os.urandom(4)
        ws.send_ping(self.ping_payload)
        self._write_out()
        self.ping_unsent = self._unsent()
        return self.ping_payload

    def ping_timed_out(self, payload: bytes) -> bool:
        """No pong for `payload` in time: close as stale, unless the ping is still queued
        behind events the viewer is taking (it reads, slowly: an outside test saw every
        viewer more than 20 s behind closed as stale, uncounted). True: wait once more."""
        if self.ping_payload is not payload or self.gone:
            return False
        left = self._unsent()
        if 0 < left < self.ping_unsent:  # bytes taken since, and the ping may not be out yet
            self.ping_unsent = left
            return True
        self.ping_payload = None
        self._close(CloseCode.STALE, "stale")
        if self.transport is not None:
            self.transport.close()
        return False

    def _unsent(self) -> int:
        return unsent_bytes(self.transport) if self.transport is not None else 0

    def write_progressed(self, now: float) -> bool:
        """Whether the peer took bytes since last asked (the wait then counts from `now`): a
        slow reader, not one that stopped reading."""
        left = self._unsent()
        progressed = left < self.unsent
        if progressed:
            self.write_started = now
        self.unsent = left
        return progressed

    def write_timed_out(self) -> None:
        """A write waited longer than the write timeout: the peer stopped reading. It cannot
        take a close frame either, so the socket is dropped."""
        self.write_started = 0.0
        if self.viewer is not None:
            self.viewer.fail(CloseCode.SLOW_CONSUMER)
        self._leave()
        if self.transport is not None:
            self.transport.abort()


class Keepalive:
    """Keepalive pings for every connection of a process on one timer, not one per connection.

    The interval and the timeout are the same for everyone, so connections become due in the
    order they were scheduled: two FIFO queues, each popped from the front while due."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self._tick = max(0.01, min(1.0, interval / 4, timeout / 4))
        self._pings: deque[tuple[float, StreamProtocol]] = deque()
        self._pongs: deque[tuple[float, StreamProtocol, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, conn: StreamProtocol) -> None:
        """Ping `conn` one interval from now."""
        if self.interval <= 0:
            return
        loop = asyncio.get_running_loop()
        self._pings.append((loop.time() + self.interval, conn))
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._run)

    def _run(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        pings, pongs = self._pings, self._pongs
        while pings and pings[0][0] <= now:
            conn = pings.popleft()[1]
            payload = conn.ping()
            if payload is not None:
                pongs.append((now + self.timeout, conn, payload))
        while pongs and pongs[0][0] <= now:
            _, conn, payload = pongs.popleft()
            if conn.ping_timed_out(payload):
                pongs.append((now + self.timeout, conn, payload))
        self._timer = loop.call_later(self._tick, self._run) if pings or pongs else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pings.clear()
        self._pongs.clear()


def protocol_class(host: WebSocketTransport) -> type[StreamProtocol]:
    """The protocol class uvicorn instantiates per WebSocket connection, bound to `host`."""

    class GatewayStreamProtocol(StreamProtocol):
        __slots__ = ()

    GatewayStreamProtocol.host = host
    return GatewayStreamProtocol


class WebSocketTransport:
    """The gateway's WebSocket side: what its protocol class needs (the token secret, and the
    gateway's state once its lifespan has started), the keepalive shared by every connection,
    and the live connections, which the write-timeout sweep looks at."""

    def __init__(self, secret: str, ping_interval_s: float, ping_timeout_s: float) -> None:
        self.secret = secret
        self.state: GatewayState | None = None
        self.keepalive = Keepalive(ping_interval_s, ping_timeout_s)
        self.connections: set[StreamProtocol] = set()
        #: Client frames allowed per CLIENT_FRAME_WINDOW_S: MAX_CLIENT_FRAMES, plus a pong
        #: per ping this process sends meanwhile (SITEWIRE_PING_INTERVAL_S may be 0.1 s).
        pongs = math.ceil(CLIENT_FRAME_WINDOW_S / ping_interval_s) if ping_interval_s > 0 else 0
        self.frame_limit = MAX_CLIENT_FRAMES + pongs

    def start(self, state: GatewayState) -> None:
        self.state = state

    def close(self) -> None:
        self.keepalive.close()

    def sweep(self, now: float, timeout: float) -> None:
        """Close connections whose queued frames have waited for flow control for `timeout`
        with nothing taken by the peer meanwhile (a viewer that stopped reading: its transport
        never drains). One that reads, however slowly, keeps its connection: a replay's writes
        to a slow reader take longer than `timeout`, and its queue is bounded all the same."""
        for conn in list(self.connections):
            if not conn.write_started or conn.write_progressed(now):
                continue
            if now - conn.write_started > timeout:
                if conn.viewer is None or conn.viewer.close_code is None:  # counted once
                    conn.state.metrics.closes.labels("write_timeout").inc()
                conn.write_timed_out()


def _request(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> Request:
    """websockets' `Request` for a head uvicorn has parsed, refused where websockets' own
    parser would refuse it (a target that is not ASCII, a body); the rest `accept` checks."""
    fields = Headers()
    for name, value in headers:
        # llhttp has checked both (a token; no control characters), as websockets would; it
        # leaves the spaces after a value, which websockets strips.
        fields.set_insecure(name.decode("ascii"), value.strip(b" \t").decode("iso-8859-1"))
    if "Transfer-Encoding" in fields:
        raise ValueError("transfer codings aren't supported")
    if not set(fields.get_all("Content-Length")) <= {"0"}:
        raise ValueError("unsupported request body")
    # uvicorn rebuilt every upgrade as HTTP/1.1, whatever the client wrote: kept so.
    return Request(target.decode("ascii"), fields, method)


def _forget_request(ws: ServerProtocol) -> None:
    """websockets' parser generator keeps the handshake `Request` (headers and all: ~2.7 KiB,
    40 % of an idle connection) in a local for the connection's life. Right after the request,
    with nothing behind it (uvicorn hands over exactly the request head), a fresh parser is
    equivalent: the state is OPEN, so it parses frames only."""
    if ws.state is OPEN:
        ws.parser = ws.parse()
        next(ws.parser)


#: The error code a refused handshake is answered with, by the status websockets chose.
_REFUSALS = {
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    500: ErrorCode.INTERNAL,
}


def _in_error_shape(response: Response) -> Response:
    """A handshake websockets refused (a bad key or version, not GET, not a stream), in the
    documented error shape (app.codes) rather than its plain text, status kept."""
    text = response.body.decode(errors="replace").strip()
    message = text.removeprefix("Failed to open a WebSocket connection: ").rstrip(".")
    code = _REFUSALS.get(response.status_code, ErrorCode.INVALID_REQUEST)
    body = orjson.dumps(ApiError(code, message or "not a WebSocket stream").body())
    headers = Headers(response.headers)
    for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body)))):
        if name in headers:
            del headers[name]  # a multi-dict: setting alone would add a second value
        headers[name] = value
    return dataclasses.replace(response, headers=headers, body=body)
