"""uvicorn's HTTP/1.1 protocol (httptools) with the bounds it lacks, for both roles.

uvicorn bounds only the idle time between two requests on a keep-alive connection. A client
could otherwise hold a connection for ever by sending nothing, send its headers a byte at a
time (slowloris), send one endless header (300 MB of it took ingest from 200 to 811 MB), or
never finish a body. Each connection here must:

- complete its request line and headers within `header_timeout_s` of connecting (or, on a
  keep-alive connection, of the request's first byte): else 408 and the connection closes;
- keep its headers within `max_header_bytes` bytes and MAX_HEADERS headers: else 431;
- complete its body within `body_timeout_s` of its headers: else 408 (or a plain close once
  the response has begun);
- have at most MAX_PIPELINED requests waiting behind the one being served: else 429.

A refusal is written after the answers still owed to earlier requests on the connection (HTTP/1.1
matches answers to requests by order: a 408 written first would be taken for the answer to an
earlier request, perhaps one that was stored), then the connection closes.

It also hands the app a way to drop a connection at once: `scope["extensions"]
["sitewire.abort"]["abort"]` (ABORT). Closing a transport waits for its write buffer to drain,
which a client that stopped reading never lets happen: a Server-Sent Events viewer closed as
slow kept its socket and megabytes of kernel buffers until the OS gave up. Beside it,
`["unsent"]` counts the bytes written that the client has not taken yet (`unsent_bytes`).

Refusals use the documented error shape (app.codes). A WebSocket upgrade leaves this protocol
once its headers are in, so the limits end there; app.gateway.transports.websocket bounds
streams itself.

A role may also name a few POST paths it serves *directly* (`Direct`): ingest's event
endpoints, the whole point of that process. Such a request keeps uvicorn's request cycle (its
body flow control, `Expect: 100-continue`, pipelining, keep-alive and shutdown) and these bounds,
but skips the ASGI app: a coroutine reads the body through the cycle and writes the response in
one write. Per single event the ASGI layer was a quarter of ingest's samples, twice its
handler's own (profiled; docs/decisions.md, "Ingest's event endpoints bypass ASGI").
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson
from starlette.types import Receive
from uvicorn.protocols.http.httptools_impl import (
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from app.codes import ErrorCode
from app.errors import ApiError
from app.settings import Settings

#: Most header lines in one request (Envoy's default is 100).
MAX_HEADERS = 100
#: The scope extension holding a callable that aborts the connection (no drain, no FIN).
ABORT = "sitewire.abort"
#: After a refusal, how long what the client still sends is read and dropped before the
#: connection closes (nginx's lingering close; see `_linger`).
LINGER_S = 2.0
#: Requests one connection may have waiting behind the one being served (HTTP pipelining).
#: uvicorn queued them without limit: 60,000 pipelined in one burst took 117 MB.
MAX_PIPELINED = 16

log = logging.getLogger(__name__)

#: A response: status, headers (lowercase names; content-type included), body.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
#: A directly served POST route: given the request's headers (as ASGI has them), the peer's
#: address and the cycle's ASGI `receive` (for the body, with its flow control), the answer.
Direct = Callable[[list[tuple[bytes, bytes]], str | None, Receive], Awaitable[Answer]]


#: How long after its idle timeout a keep-alive connection is looked at again (one more loop
#: iteration, so that a request already waiting in its socket is read first).
KEEPALIVE_RECHECK_S = 0.01


class TakesUpgrade(asyncio.Protocol):
    """A WebSocket protocol that takes its upgrade request as this protocol parsed it.

    uvicorn hands a WebSocket protocol the request head rebuilt as bytes (`data_received`),
    for it to parse a second time; a subclass of this gets `take_upgrade` instead. Names and
    values have passed llhttp's checks and this protocol's bounds (MAX_HEADERS,
    `max_header_bytes`); names are lowercase, as in an ASGI scope. It is constructed as uvicorn
    constructs any WebSocket protocol (`config`, `server_state`, `app_state`)."""

    def take_upgrade(
        self, method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """The request: its method, its raw target (path and query) and its headers."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class HttpLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes)


class BoundedHttp(HttpToolsProtocol):
    """One HTTP/1.1 connection under `limits` (set on the class by `protocol_class`)."""

    limits: ClassVar[HttpLimits]
    #: POST paths (raw, without a query string) served without ASGI, on the public listener.
    direct: ClassVar[Mapping[bytes, Direct]] = {}
    #: The internal listener's port (metrics and probes): never served directly.
    internal_port: ClassVar[int | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: From the connection (or a keep-alive request's first byte) to its headers.
        self._in_headers = True
        self._header_bytes = 0  # bytes read while in headers
        self._header_count = 0
        self._header_sum = 0  # bytes of this request's header names and values
        #: When the current phase must be done (loop time), None between requests.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: Refused: input is dropped until the connection closes; the refusal is written at
        #: once, or (`_owed`) once the earlier requests' answers are out.
        self._refused = False
        self._owed: tuple[ErrorCode, str] | None = None
        #: The scope extensions of every request on this connection (`connection_made`).
        self._extensions: dict[str, dict[object, object]] = {}
        #: The keep-alive timer fired once already and looks again (`timeout_keep_alive_handler`).
        self._keepalive_recheck = False

    # -- the request's phases ----------------------------------------------------------------

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn closes an idle keep-alive connection here. But after a stall of the event
        loop (a paused process, a long collection) this timer may fire before the loop has
        read a request that came in time: uvloop runs due timers before it polls the sockets,
        and an outside test had every keep-alive connection holding a request reset (nothing
        answered, nothing stored). So the first time, look again just after the next poll:
        `data_received` cancels this timer as it cancels uvicorn's."""
        if not self._keepalive_recheck:
            self._keepalive_recheck = True
            self.timeout_keep_alive_task = self.loop.call_later(
                KEEPALIVE_RECHECK_S, self.timeout_keep_alive_handler
            )
            return
        super().timeout_keep_alive_handler()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The connection's, so made once here and given to each of its requests' scopes.
        self._extensions = {
            ABORT: {"abort": transport.abort, "unsent": lambda: unsent_bytes(transport)}
        }
        self._arm(self.limits.header_timeout_s)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._keepalive_recheck = False
        if not self._in_headers:  # the next request on a keep-alive connection
            self._in_headers = True
            self._header_bytes = 0
            self._arm(self.limits.header_timeout_s)
        self._header_count = 0
        self._header_sum = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, f"more than {MAX_HEADERS} headers")
            return
        # Counted here too: `data_received` counts whole reads, and a request that begins in
        # the middle of one (pipelined after another) starts its count at the next read.
        self._header_sum += len(name) + len(value)
        if self._header_sum > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, f"request headers over {limit} bytes")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:  # refused halfway through this read: no request reaches the app
            return
        if self.parser.should_upgrade() and not self._should_upgrade():
            # Only WebSocket upgrades are taken. The parser stops at any other (curl --http2
            # asks for h2c), so the body would be lost: refused, plainly, instead (still "in
            # headers": the request has no cycle of its own, see `_refuse`).
            self._refuse(
                ErrorCode.INVALID_REQUEST,
                "protocol upgrades other than WebSocket are not supported: send plain HTTP/1.1",
            )
            return
        self._in_headers = False
        self._arm(self.limits.body_timeout_s)
        self.scope["extensions"] = self._extensions
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            self._refuse(ErrorCode.RATE_LIMITED, f"more than {MAX_PIPELINED} requests pipelined")

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Checked after parsing, so that headers and a body in one read are not counted as
        # headers; an endless header is refused within one read of the limit.
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, f"request headers over {limit} bytes")

    def send_400_response(self, msg: str) -> None:
        """A request the parser cannot read: the documented error shape, not uvicorn's text."""
        self._refuse(ErrorCode.INVALID_REQUEST, msg)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the WebSocket protocol takes the connection over
        self._stop_timer()
        if self._refused:
            # Refused in this same read (headers over a bound): llhttp still reports the
            # upgrade, but the refusal is the answer, and there is no request to hand over.
            return
        protocol_class = self.ws_protocol_class
        if protocol_class is None or not issubclass(protocol_class, TakesUpgrade):
            super().handle_websocket_upgrade()
            return
        # As uvicorn's, but the request goes over as parsed here, not rebuilt as bytes for the
        # WebSocket protocol to parse again (a tenth of a gateway's cost per admission).
        method, headers = self.scope["method"], self.scope["headers"]
        self.connections.discard(self)
        protocol = protocol_class(  # type: ignore[call-arg]  # uvicorn's constructor
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.connection_made(self.transport)
        try:
            protocol.take_upgrade(method, self.url, headers)
        except Exception:
            # A bug: the transport is still ours, so its loss would never reach `protocol`,
            # which would stay in the server's connections for good. Drop both now.
            log.exception("WebSocket upgrade failed")
            protocol.connection_lost(None)
            self.transport.abort()
            return
        self.transport.set_protocol(protocol)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_timer()
        super().connection_lost(exc)

    # -- directly served routes ----------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """uvicorn's hook for starting a request (at once, or when its turn in a pipeline
        comes): a direct route runs its own coroutine on the same cycle."""
        scope = cycle.scope
        route = self.direct.get(scope["raw_path"]) if scope["method"] == "POST" else None
        server = scope["server"]
        if (
            route is None
            or scope["query_string"]
            or app is not self.app  # uvicorn's concurrency-limit 503 stands in for the app
            or (server is not None and server[1] == self.internal_port)
        ):
            super()._start_asgi_task(cycle, app)
            return
        serve = _serve_direct(cycle, route, self.client, self.limits.body_timeout_s)
        task = self.loop.create_task(serve)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    # -- deadlines and refusals --------------------------------------------------------------

    # One timer per connection serves every deadline, lazily: a request sets two deadlines and
    # clears one, and creating and cancelling a timer each time cost ~2 us, a twentieth of a
    # single event's whole cost at ingest. The timer is moved only when a deadline comes
    # before it; when it fires early (the deadline moved later, or was cleared) it re-arms or
    # lapses.

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds
        if self._timer is None or self._deadline < self._timer_at:
            self._stop_timer()
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _disarm(self) -> None:
        self._deadline = None

    def _stop_timer(self) -> None:
        """Cancel the timer itself (the connection is gone or handed over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._expired()

    def _expired(self) -> None:
        self._deadline = None
        what = "headers" if self._in_headers else "body"
        self._refuse(ErrorCode.REQUEST_TIMEOUT, f"the request's {what} took too long")

    def on_response_complete(self) -> None:
        last = not self.pipeline  # no request waits behind the one just answered
        super().on_response_complete()
        if last and self._owed is not None:
            code, message = self._owed
            self._owed = None
            self._write_refusal(code, message)

    def _refuse(self, code: ErrorCode, message: str) -> None:
        """Answer with `code` unless a response has begun, and close the connection; after
        the answers owed to earlier requests, if any."""
        self._disarm()
        if self.transport is None or self.transport.is_closing() or self._refused:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Whose cycle is it? During headers, the refused request has none yet: `cycle` is
            # an earlier request's, still owed its answer. After them, it is the refused
            # request's own, waiting in the pipeline behind earlier ones, or being served.
            queued = bool(self.pipeline) and self.pipeline[0][0] is cycle
            if queued:
                self.pipeline.popleft()  # never started: nothing of it is answered
            if self._in_headers or queued:
                self._refused = True  # drop what the client still sends
                self._owed = (code, message)
                return
            cycle.disconnected = True  # the app, if running, sees the client gone
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._write_refusal(code, message)

    def _write_refusal(self, code: ErrorCode, message: str) -> None:
        if self.transport.is_closing():
            return
        body = orjson.dumps(ApiError(code, message).body())
        head = (
            f"HTTP/1.1 {code.status} {code.code}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self._linger()

    def _linger(self) -> None:
        """Close without losing the answer: closing a socket with unread input makes the
        kernel send a reset, which can destroy the answer before the client reads it. So stop
        writing (the client sees the end of the answer), drop whatever it still sends, and
        close after LINGER_S."""
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


async def _serve_direct(
    cycle: RequestResponseCycle,
    route: Direct,
    client: tuple[str, int] | None,
    write_timeout_s: float,
) -> None:
    """One directly served request, with what uvicorn's `run_asgi` and `send` would do around
    an app: a crash answers 500, the response goes out in one write, and the cycle completes
    (which starts the next pipelined request or arms the keep-alive timer). A client that
    stops reading its answers gets `write_timeout_s` to drain them, then loses the connection
    (uvicorn's `send` would wait for ever)."""
    peer = client[0] if client else None
    try:
        try:
            # uvicorn's types are narrower than ASGI's (the headers are a list, `receive`
            # returns its own message types): the route is given what an ASGI app would be.
            headers = cast(list[tuple[bytes, bytes]], cycle.scope["headers"])
            answer = await route(headers, peer, cast(Receive, cycle.receive))
        except Exception:
            log.exception("directly served route failed")
            answer, cycle.keep_alive = _INTERNAL_ERROR, False
        try:
            if cycle.flow.write_paused and not cycle.disconnected:
                async with asyncio.timeout(write_timeout_s):
                    await cycle.flow.drain()
            _respond(cycle, *answer)
        except TimeoutError:
            cycle.transport.abort()
        except Exception:
            log.exception("writing a directly served answer failed")
            cycle.transport.close()
    except asyncio.CancelledError:
        # uvicorn's shutdown gave up waiting: whether the request took effect is unknown, so
        # no answer is better than a wrong one (a client with an event id retries safely).
        cycle.transport.close()
        raise
    finally:
        cycle.on_response = lambda: None  # as run_asgi: no reference back to the protocol


_INTERNAL_ERROR: Answer = (
    500,
    [(b"content-type", b"text/plain; charset=utf-8")],
    b"Internal Server Error",
)


def _respond(
    cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    if cycle.disconnected or cycle.response_started:  # gone, or refused (`_refuse`)
        return
    content = [STATUS_LINE[status]]
    for name, value in [*cycle.default_headers, *headers]:
        if HEADER_VALUE_RE.search(value):  # echoed request headers (Origin) included
            raise RuntimeError("invalid HTTP header value")
        content += [name, b": ", value, b"\r\n"]
    content.append(b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += [b"\r\n", body]
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes written to `transport` that its peer has not acknowledged: in the transport's
    buffer and in the kernel's send queue (Linux's SIOCOUTQ; the buffer alone elsewhere).

    How a writer tells a slow reader from one that stopped reading: this falls whenever the
    peer takes bytes. The transport's buffer alone does not show it: the kernel wakes a writer
    only once a third of its send buffer (up to 4 MB) is free, so a reader at 80 KB/s leaves a
    write waiting for seconds while it reads all along."""
    size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is None:
        return int(size)
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # not Linux, or the socket is already closed
        return int(size)
    return int(size) + int.from_bytes(queued, sys.byteorder, signed=True)


def protocol_class(
    settings: Settings,
    direct: Mapping[bytes, Direct] | None = None,
    internal_port: int | None = None,
) -> type[BoundedHttp]:
    """The HTTP protocol class for uvicorn (`Config(http=...)`), bound to these limits, with
    `direct` POST routes served without ASGI except on `internal_port`."""
    attributes = {
        "limits": HttpLimits.from_settings(settings),
        "direct": dict(direct or {}),
        "internal_port": internal_port,
    }
    return type("BoundedHttp", (BoundedHttp,), attributes)
